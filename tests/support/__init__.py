"""The test harness and its helpers, imported by tests as ``tests.support.<module>``."""
