"""`inatpipe serve`: a model behind a JSON API and one offline HTML page (app.py, page.html)."""
