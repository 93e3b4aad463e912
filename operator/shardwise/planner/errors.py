"""The one exception the planner raises for a request it cannot plan (a bad value, not a misfit)."""


class PlanInputError(ValueError):
    """A request value is invalid (unknown preset, TP not dividing the heads, ...).

    The message is one line and names the bad value; the CLI prints it and exits 2, the operator
    puts it in a status condition. A request that is valid but does not fit is *not* an error:
    it is an infeasible PlanResult with a diagnosis.
    """
