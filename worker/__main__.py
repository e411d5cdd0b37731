"""`python -m worker`: the same as `flywheel worker`."""

from service.cli import app

app(["worker"])
