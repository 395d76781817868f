"""Parses an OpenMetrics page from stdin with the Prometheus client's strict parser and
prints what it found as JSON: family name -> {type, samples, exemplars}. A page the parser
rejects makes it exit non-zero with the parser's error."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    families[family.name] = {
        "type": family.type,
        "samples": len(family.samples),
        "exemplars": [
            dict(s.exemplar.labels) for s in family.samples if s.exemplar is not None
        ],
    }
print(json.dumps(families))
