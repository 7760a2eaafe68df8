"""The stages and what runs them; importing this registers every ``+stage=<name>``."""
from fsd_d2.engine import (export, latency, pipeline, prepare, random_arch, search, train,  # noqa: F401  (stages)
                           visualize)
