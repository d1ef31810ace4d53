from pipeline.shard import main

raise SystemExit(main())
