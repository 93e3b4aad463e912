"""shardwise: plan and run large-model training layouts on Kubernetes."""

__version__ = "0.1.0"
