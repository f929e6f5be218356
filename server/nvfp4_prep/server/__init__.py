"""The nvfp4-prep gRPC server.

Importing the package loads nothing else: ``config`` holds the flags (the CLI
reads them for ``--help``), ``server.PrepServer`` and ``server.run`` start it.
"""
