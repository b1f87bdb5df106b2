"""Test helpers shipped with the package: ``fuzz`` (random conv nets and pass options for property tests of
``convert()``) and ``load_fuzz`` (mutated saved files for :func:`fxsurgeon.load`)."""
