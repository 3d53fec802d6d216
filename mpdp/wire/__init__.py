"""The wire between the dispatcher and its workers: the protocol (``protocol.py``) and the one
socket factory (``transport.py``)."""
