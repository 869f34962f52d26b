class ErcDataError(Exception):
    """Bad or missing input. The message is one line and starts with the offending file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # crosses process boundaries (Ray workers) intact
        return (type(self), (self.path, self.problem))
