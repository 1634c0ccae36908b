"""`mhsft review`: blind side-by-side rating of two or more systems' replies by clinicians, with statistics.

commands.py  the verb: create | serve | stats | export
study.py     a study from eval folders or infer outputs: common items, the sample, who rates what, which side
store.py     the database (SQLite or any SQLAlchemy URL): versioned schema, migrations, one transaction a rating
app.py       the raters' pages (FastAPI, server-rendered templates/, offline)
stats.py     means with CIs, win rates, Bradley-Terry, Krippendorff's alpha, judge vs humans, export
"""
