"""Test kit shipped with memforge (like pytest's ``pytester``): hypothesis strategies for specs
and configs, for memforge's own tests and for plugin authors' tests of their components."""
