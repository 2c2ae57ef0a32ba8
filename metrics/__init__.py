"""Metric maths: exact streaming accumulators, scopes, the aggregator, CSV writers, the legacy evaluator."""
