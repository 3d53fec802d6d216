"""The worker side: its spec (``spec.py``, plain data) and its loop (``loop.py``)."""
