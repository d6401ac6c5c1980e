"""A Prometheus ``/metrics`` page as the tests read it: fetched over HTTP from a real metrics
port, parsed with ``prometheus_client.parser`` into samples (name, labels, value, family), and
the figures a test asserts on picked out of those samples by name and labels. A sample is
looked for in the family its name implies, so a test also sees each family typed as expected."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import NamedTuple

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS_TEXT = "text/plain; version="
"""How the content type of a page in the Prometheus text format starts."""


class Answer(NamedTuple):
    """What an HTTP GET answered: its status, content type and body."""

    status: int
    content_type: str
    text: str


class Sample(NamedTuple):
    """One line of a page: the sample's name (``_total``, ``_bucket`` and the like included),
    its labels, its value, and the name of the family the parser put it in (the one its
    ``# TYPE`` line names; the sample's own name where there is none)."""

    name: str
    labels: dict[str, str]
    value: float
    family: str


FAMILY_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
"""What a counter's or a histogram's sample name adds to its family's name."""


def family_of(sample_name: str) -> str:
    """The family a sample named ``sample_name`` belongs in: ``x_total`` in counter ``x``,
    ``x_count`` in histogram (or summary) ``x``, any other name in a family of its own name."""
    family = sample_name
    for suffix in FAMILY_SUFFIXES:
        family = family.removesuffix(suffix)
    return family


def get(url: str, timeout: float = 10.0) -> Answer:
    """GET ``url`` (``/metrics``, ``/health`` or any other path of a metrics port); an HTTP
    error status is answered, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return Answer(
                response.status, response.headers["Content-Type"], response.read().decode()
            )
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers["Content-Type"], exc.read().decode())


def fetch(where: int | str, *, timeout: float = 10.0, content_type: str = "") -> str:
    """The text of a ``/metrics`` page: ``where`` is its URL, or a port on 127.0.0.1. The answer
    must be 200, and its content type start with ``content_type``."""
    url = where if isinstance(where, str) else f"http://127.0.0.1:{where}/metrics"
    answer = get(url, timeout)
    assert answer.status == 200, (url, answer.status, answer.text[:500])
    assert answer.content_type.startswith(content_type), (url, answer.content_type)
    return answer.text


def parse(text: str) -> list[Sample]:
    """Every sample of a page, in the page's order."""
    return [
        Sample(sample.name, sample.labels, sample.value, family.name)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def families(text: str) -> dict[str, Metric]:
    """The metric families of a page (type, help and samples) by family name."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape(where: int | str, *, timeout: float = 10.0, content_type: str = "") -> list[Sample]:
    """Every sample of the ``/metrics`` page at ``where`` (see ``fetch``)."""
    return parse(fetch(where, timeout=timeout, content_type=content_type))


def select(samples: list[Sample], sample_name: str, /, **labels: str) -> list[Sample]:
    """The samples named ``sample_name`` whose labels include ``labels``, in the page's order.
    Only those in the family the name implies count (``family_of``): a ``_total`` sample whose
    family is not typed a counter is not found, nor one whose family lost its ``# TYPE``."""
    family = family_of(sample_name)
    return [
        sample
        for sample in samples
        if sample.name == sample_name
        and sample.family == family
        and all(sample.labels.get(k) == want for k, want in labels.items())
    ]


def value(samples: list[Sample], sample_name: str, /, **labels: str) -> float:
    """Sum of the samples named ``sample_name`` whose labels include ``labels`` (0 if none)."""
    return sum(sample.value for sample in select(samples, sample_name, **labels))


def series_value(samples: list[Sample], sample_name: str, /, **labels: str) -> float:
    """The value of the one series named ``sample_name`` whose labels are exactly ``labels``;
    the page must export it (a counter at 0 included)."""
    found = [s.value for s in select(samples, sample_name, **labels) if s.labels == labels]
    assert len(found) == 1, f"{sample_name}{labels} on the page: {found}"
    return found[0]


def by_labels(
    samples: list[Sample], sample_name: str, keys: tuple[str, ...], /, **labels: str
) -> dict[tuple[str, ...], float]:
    """Sums of the samples named ``sample_name`` whose labels include ``labels``, by the values
    of their labels ``keys``."""
    found: dict[tuple[str, ...], float] = {}
    for sample in select(samples, sample_name, **labels):
        key = tuple(sample.labels[k] for k in keys)
        found[key] = found.get(key, 0) + sample.value
    return found


def by_label(
    samples: list[Sample], sample_name: str, key: str, /, **labels: str
) -> dict[str, float]:
    """Sums of the samples named ``sample_name`` whose labels include ``labels``, by the value of
    their label ``key``."""
    return {k: v for (k,), v in by_labels(samples, sample_name, (key,), **labels).items()}


def with_prefix(samples: list[Sample], prefix: str) -> list[Sample]:
    """The samples whose names start with ``prefix``."""
    return [sample for sample in samples if sample.name.startswith(prefix)]
