"""Speed benchmarks: each module measures one part and returns a JSON-ready dict (no click here)."""
