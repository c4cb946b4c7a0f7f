"""The main job and its rounds: the stage table (`stages`), the runner (`runner`, `stage_runner`), the second lane
(`lanes`), the run directory's manifest and summary (`manifest`, `summary`), red-teaming (`redteam`), several seeds
(`seeds`). `safealign pipeline` runs `runner.run`."""
