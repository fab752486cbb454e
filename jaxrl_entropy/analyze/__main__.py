from jaxrl_entropy.analyze.cli import main

raise SystemExit(main())
