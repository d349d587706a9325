"""Performance model: kernel costs -> step times -> memory fit -> closed-loop TTFT/TPOT."""
