"""What the tests and the benchmarks share: the fake Twilio, the kernel's timestamps of
its requests, launchers of real pgqueue processes (harness, worker_harness), helpers
that drive the public API, and the statistics that judge a run."""
