"""The stages and what runs them; importing this registers every ``+stage=<name>``."""
from fsd_d2.engine import latency, pipeline, prepare, random_arch, search, train, visualize  # noqa: F401  (stages)
