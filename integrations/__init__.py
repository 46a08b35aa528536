"""Model-family integrations, installed as ``memflow_adapter.integrations``."""
