"""Searching one compression per kernel under an accuracy or size budget.

`candidates` names what a kernel can become and the stages that make it; `sensitivity`
measures each kernel's bytes and error under each candidate; `solve` walks the frontier of
bytes against error; `stage` registers the `search` recipe stage, which verifies frontier
points on held-out training rows and returns the smallest one within the budget.
"""

from jaxshrink.search.candidates import Candidate, assignment_stages, parse_candidate  # noqa: F401
from jaxshrink.search.solve import Point, frontier  # noqa: F401
