"""The competition metric and label-consistency rules, written once (the weights in :mod:`pedetect.labels`, the rules in :mod:`pedetect.metric.rules`)."""
