"""Files an attacker could hand the engine."""


class RunsCode:
    """Unpickling this creates a marker file: what a crafted dataset or checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
