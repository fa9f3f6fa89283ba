"""Placeholder: the web page at / lands here."""

from flask import Blueprint

bp = Blueprint("web", __name__)
