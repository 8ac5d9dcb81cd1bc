"""What a run leaves behind: resumable state, report.json/md, W&B tracking."""
