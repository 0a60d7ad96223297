"""The benchmark of issue 7: `bench/run` measures the relay against a naive baseline."""
