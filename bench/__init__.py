"""The benchmark harness of issue 4: jobstate and etcd side by side (``make bench``, ``make bench QUICK=1``)."""
