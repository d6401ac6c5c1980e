"""Continuous learning: what the server predicted, the outcomes that came back, and retraining.

``samples``         the feedback samples directory (SQLite + Parquet parts): layout, schemas,
                    the one reader
``feedback_store``  the durable writer of samples: SQLite group commit (committed and fsynced
                    before Feedback is acknowledged), compaction to Parquet
``prediction_log``  every answered prediction, in memory for the join and as Parquet; its
                    rooms: ``prediction_ring`` (the rows in memory), ``part_files`` (the
                    parts' schema, names, listing, reading), ``part_index`` (which ids a
                    part holds: ``_parts.index``), ``part_rollup`` (the hourly merge)
``feedback``        Feedback validated against every limit and joined to the prediction; the
                    live record (FeedbackLoop)
``replay``          ``xylen-server replay``: recompute a logged prediction bit-exactly
``retrainer``       retrain jobs in the server: one at a time, triggers, promotion
``gate``            the validation gate, a pure function
``job/``            the retrain job, a low-priority subprocess (``python -m ...learning.job``)
"""
