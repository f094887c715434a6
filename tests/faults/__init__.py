"""Fault injection: named, documented regressions of the simulator that the conformance properties must catch."""
