"""Integrations of the pool with other frameworks (DSPy: ``mpdp.integrations.dspy``)."""
