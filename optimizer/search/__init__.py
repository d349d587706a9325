"""Search: enumerate serving configurations, screen them analytically, confirm the frontier
with the simulator, and return a Pareto front with an explained recommendation."""
