"""Pure layout planner: model shapes, the memory model, the cost model and the layout search."""
