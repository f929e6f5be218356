"""The bulk transport of the server: tensor chunks over TCP (or TLS) connections beside a Prepare call.

``tickets`` hands out and checks the one-time tickets that bind a connection to a call, ``listener`` accepts
the connections, and ``connection`` is a call's side: its offer, the choice between bulk and inline, and the
chunks it receives and sends.
"""
