"""The ``owl-sparse`` command line (:mod:`.main`, argparse only here) and the demo
(:mod:`.demo`, driven by a `DemoConfig`)."""
