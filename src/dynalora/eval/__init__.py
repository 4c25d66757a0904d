"""Quality evaluations, each against honest baselines; every command writes JSON and prints a table."""
