"""What a run did, after the fact: read run folders, draw and tabulate them, warn about likelihood displacement,
write the run's model card and report.md. Standard library at import time; matplotlib and torch only where drawn or
where a paper is looked up."""
