"""Scrapes an agent's /metrics and parses it with prometheus_client's own parser (which rejects
malformed exposition text). Prints {family: {"type": ..., "samples": [[name, labels, value]...]}}.

usage: scrape_metrics.py URL
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

with urllib.request.urlopen(sys.argv[1], timeout=60) as r:
    content_type = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
out = {"_content_type": content_type}
for fam in text_string_to_metric_families(text):
    out[fam.name] = {
        "type": fam.type,
        "samples": [[s.name, s.labels, s.value] for s in fam.samples],
    }
json.dump(out, sys.stdout)
