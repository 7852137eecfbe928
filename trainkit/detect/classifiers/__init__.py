"""One classifier per fault class, each reading the same :class:`Timeline`.

The seam (:class:`Classifier`, in ``base``) says who calls what in which order. Thresholds
for slowness are learned online from the job's periodic behaviour: each step repeats the
same collectives, so a rank's normal lateness and a collective's normal duration are
estimated from the job itself, and only statistically significant departures that
persist over a window of steps are reported. Start-up (warm-up steps), one-off pauses
(checkpoints) and uneven first steps do not persist, so they raise nothing.

A new fault class: a module here with a class satisfying :class:`Classifier`, one entry
in :data:`CLASSIFIERS`, its finding class in ``trainkit.rundir.FINDING_CLASSES``, and (if
``trainkit run`` should act on it) a rule in ``trainkit.run.policy``. The contract test
(``tests/test_classifier_registry.py``) runs over every entry by itself.
"""

from __future__ import annotations

from collections.abc import Callable

from trainkit.detect.classifiers.base import Classifier, make_finding
from trainkit.detect.classifiers.crash import CrashClassifier
from trainkit.detect.classifiers.hang import HangClassifier
from trainkit.detect.classifiers.slow_link import SlowLinkClassifier
from trainkit.detect.classifiers.straggler import StragglerClassifier
from trainkit.detect.knobs import ClassifierConfig

__all__ = ["CLASSIFIERS", "Classifier", "CrashClassifier", "HangClassifier",
           "SlowLinkClassifier", "StragglerClassifier", "make_classifiers", "make_finding"]

# Explicit registry: name -> constructor. The aggregator runs all of them, in this order.
CLASSIFIERS: dict[str, Callable[[ClassifierConfig], Classifier]] = {
    "crash": CrashClassifier,
    "hang": HangClassifier,
    "straggler": StragglerClassifier,
    "slow_link": SlowLinkClassifier,
}


def make_classifiers(cfg: ClassifierConfig) -> list[Classifier]:
    """Fresh instances of every registered classifier (one set per restart attempt)."""
    return [factory(cfg) for factory in CLASSIFIERS.values()]
