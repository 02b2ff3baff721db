"""Test kit shipped with memforge (like pytest's ``pytester``), for memforge's own tests and for
plugin authors' tests of their components; it needs pytest and hypothesis, which the library
never imports at run time.

* :mod:`memforge.testing.strategies`: hypothesis strategies for configs and specs.
* :mod:`memforge.testing.conformance`: the conformance kit, behavioural checks of a memory layer,
  memory network or objective (docs/plugins.md, "Testing your plugin with the conformance kit").
"""
