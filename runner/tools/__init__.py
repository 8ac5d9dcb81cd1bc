"""Commands beside the main job: plan (sizing), quickstart and its assets."""
