"""The pool's core: the dispatcher thread (``dispatcher.py``) and what it alone drives —
the supervisor of worker slots, admission, the pool's futures."""
