"""The benchmark runner behind `python -m lightmotion_fast bench` (scenarios live in benchmarks/scenarios/)."""
