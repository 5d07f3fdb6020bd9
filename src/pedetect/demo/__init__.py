"""``pedetect demo``: the orchestration above inference (synth → prepare → train → predict → evaluate)."""
