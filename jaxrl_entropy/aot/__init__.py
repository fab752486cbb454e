"""Ahead-of-time tooling: `dryrun` compiles every program of a step for a real slice, and the
HLO statistics it reports."""
