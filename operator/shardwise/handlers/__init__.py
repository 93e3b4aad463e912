"""Thin kopf handlers: read state, call the planner and builders, apply children, patch status."""
