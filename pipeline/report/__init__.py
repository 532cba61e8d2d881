"""What people read: tables and JSON for plan, build and ls, the HTML report page and its figures."""
