"""The ``nvfp4-prep`` command line: the one place that composes the SDK, the server and the offline job."""
