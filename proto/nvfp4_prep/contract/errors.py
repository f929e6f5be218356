"""The one error type of bad input, named by field: the pipeline, the wire and the server all raise it."""


class PrepError(ValueError):
    """Input that the pipeline cannot prepare.

    ``field`` names the offending tensor or parameter and ``expected`` says what
    would have been accepted, so that the service can put both on the wire.
    """

    def __init__(self, field: str, problem: str, expected: str = "") -> None:
        self.field = field
        self.problem = problem
        self.expected = expected
        message = f"{field}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)
