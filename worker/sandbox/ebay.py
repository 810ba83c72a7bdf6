"""eBay's OAuth client-credentials token endpoint and Browse item_summary/search.

POST /identity/v1/oauth2/token issues Application access tokens; GET
/buy/browse/v1/item_summary/search needs one (Bearer, unexpired), the
X-EBAY-C-MARKETPLACE-ID header, and keeps to the rules of eBay's OpenAPI document
for the Browse API (v1.20.4): limit 1..200, offset 0..9 999 and a multiple of
limit, at most 10 000 results per query, `q` cut at 100 characters, at most 250
sellers in the filter. `total` is an estimate (see `Faults.ebay_total_skew`);
`next` and `prev` are present only when there is such a page. Errors use eBay's
{"errors": [{"errorId", ...}]} shape and ids; an unknown seller is a warning
(12003) in a 200 answer, as the document lists it.

GET /buy/browse/v1/item/{item_id} (getItem) answers the item the search lists, with
`gtin`, `mpn`, `brand` and `localizedAspects`; an unknown or removed item is HTTP 404
with errorId 11001. It is admitted like the search (token, marketplace, the same rate
window per client, queued failures).
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
from typing import Any

from aiohttp import web

from .catalog import JSON
from .state import (
    RECORD,
    SANDBOX,
    Rejected,
    Sandbox,
    basic_credentials,
    failure_response,
    json_response,
    truncated_json,
)

TOKEN_PATH = "/identity/v1/oauth2/token"
SEARCH_PATH = "/buy/browse/v1/item_summary/search"
ITEM_PATH = "/buy/browse/v1/item/{item_id}"
FIELDGROUPS = frozenset({"PRODUCT", "COMPACT", "ADDITIONAL_SELLER_DETAILS", "CHARITY_DETAILS"})
COMPACT_FIELDS = (
    "itemId",
    "bidCount",
    "currentBidPrice",
    "eligibleForInlineCheckout",
    "estimatedAvailabilities",
    "gtin",
    "immediatePay",
    "itemAffiliateWebUrl",
    "itemCreationDate",
    "itemWebUrl",
    "legacyItemId",
    "minimumPriceToBid",
    "price",
    "priorityListing",
    "reservePriceMet",
    "sellerItemRevision",
    "shippingOptions",
    "taxes",
    "topRatedBuyingExperience",
    "uniqueBidderCount",
)
"""The fields `fieldgroups=COMPACT` keeps, as getItem's `fieldgroups` lists them."""
API_SCOPE = "https://api.ebay.com/oauth/api_scope"
MARKETPLACES = frozenset({"EBAY_US", "EBAY_GB", "EBAY_DE", "EBAY_FR", "EBAY_IT", "EBAY_ES"})
MAX_LIMIT = 200
MAX_RESULTS = 10_000
MAX_Q = 100
MAX_SELLERS = 250
_SELLERS = re.compile(r"sellers:\{([^}]*)\}")


def add_routes(app: web.Application) -> None:
    app.router.add_post(TOKEN_PATH, token)
    app.router.add_get(SEARCH_PATH, search)
    app.router.add_get(ITEM_PATH, item)


def error(error_id: int, message: str, *, domain: str = "API_BROWSE") -> dict[str, Any]:
    category = "APPLICATION" if error_id == 12000 else "REQUEST"
    return {
        "errors": [
            {
                "errorId": error_id,
                "domain": domain,
                "category": category,
                "message": message,
                "longMessage": message,
            }
        ]
    }


async def token(request: web.Request) -> web.Response:
    """Client-credentials grant: Basic client_id:client_secret, form body."""
    sandbox = request.app[SANDBOX]
    record = request[RECORD]
    record.api = "oauth"
    client_id, secret = sandbox.ebay_client
    credentials = basic_credentials(request.headers.get("Authorization", ""))
    if credentials is None or not (
        hmac.compare_digest(credentials[0].encode(), client_id.encode())
        and hmac.compare_digest(credentials[1].encode(), secret.encode())
    ):
        return _oauth_error(401, "invalid_client", "client authentication failed")
    record.who = client_id
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return _oauth_error(
            400,
            "unsupported_grant_type",
            "grant type in request is not supported by the authorization server",
        )
    scopes = str(form.get("scope", "")).split()
    if not scopes or any(scope != API_SCOPE for scope in scopes):
        return _oauth_error(
            400,
            "invalid_scope",
            "The requested scope is invalid, unknown, malformed, or exceeds the scope "
            "granted to the client",
        )
    now = sandbox.clock()
    sandbox.tokens = {t: v for t, v in sandbox.tokens.items() if v[1] > now}
    access_token = f"v^1.1#i^1#sandbox#{secrets.token_urlsafe(32)}"
    sandbox.tokens[access_token] = (client_id, now + sandbox.token_ttl)
    sandbox.tokens_issued += 1
    return json_response(
        {
            "access_token": access_token,
            "expires_in": math.ceil(sandbox.token_ttl),
            "token_type": "Application Access Token",
        }
    )


async def search(request: web.Request) -> web.Response:
    """One page of item summaries for q, optionally filtered by sellers."""
    sandbox = _admit(request)
    query = request.query
    # eBay cuts a longer q rather than refusing it ("Strings longer than 100-characters
    # are truncated"): a connector that sends one gets answers for another search.
    q = query.get("q", "").strip()[:MAX_Q].strip()
    if not q:
        return _bad(
            12001,
            "The call must have a valid 'q', 'category_ids', 'epid' or 'gtin' query parameter.",
        )
    limit = _int_param(
        query.get("limit", "50"), 12007, "The 'limit' value must be an integer value."
    )
    offset = _int_param(query.get("offset", "0"), 12005, "The 'offset' value must be an integer.")
    record = request[RECORD]
    record.offset = offset
    if not 1 <= limit <= MAX_LIMIT:
        return _bad(12006, "The 'limit' value should be between 1 and 200 (inclusive).")
    if offset < 0:
        return _bad(12004, "The 'offset' value cannot be negative.")
    # Only `offset` is bounded (Max 9,999); a page starting below 10 000 is answered, cut
    # at the 10 000th result ("a maximum of 10,000 items in one results set").
    if offset >= MAX_RESULTS:
        return _bad(
            12029,
            "The maximum number of listings that can be retrieved is 10,000, so your offset "
            "value must be less than 10,000. If 10,000 or more listings are matching your "
            "search criteria, consider narrowing the scope of your search.",
        )
    if offset % limit:
        return _bad(
            12515, "The 'offset' value must be either zero or a multiple of the 'limit' value."
        )
    sellers = _sellers(query.get("filter", ""))
    if sellers is not None and len(sellers) > MAX_SELLERS:
        return _bad(
            12032,
            "The number of sellers in the filter has exceeded the limit. Please reduce the "
            "number of sellers to 250 or fewer.",
        )
    page = offset // limit + 1
    record.page = page
    await sandbox.page_delay(page)
    faults = sandbox.faults
    if page in faults.error_pages:
        return json_response(
            error(12000, "There was a problem with an eBay internal system or process."), status=500
        )
    catalog = sandbox.catalog
    found = catalog.ebay_search(q=q, sellers=sellers)
    items = found[:MAX_RESULTS][offset : offset + limit]
    if page in faults.malformed_item_pages and items:
        broken = dict(items[0], price={"value": "abc", "currency": "USD"})
        del broken["itemId"]
        items = [broken, *items[1:]]
    body = _page(request, matches=len(found), limit=limit, offset=offset, items=items)
    known = set(catalog.ebay_sellers())
    unknown = [seller for seller in sellers or () if seller not in known]
    if unknown:
        body["warnings"] = [_unknown_seller(seller) for seller in unknown]
    if page in faults.malformed_json_pages:
        return truncated_json(body)
    return json_response(body)


async def item(request: web.Request) -> web.Response:
    """getItem: one item's details, by its RESTful id (`v1|<legacy id>|0`)."""
    sandbox = _admit(request, marketplace_error=11011)
    groups = [g.strip() for g in request.query.get("fieldgroups", "").split(",") if g.strip()]
    unknown = [g for g in groups if g not in FIELDGROUPS]
    if unknown:
        return _bad(
            11501,
            f"The 'fieldgroups' value(s) are invalid: {','.join(unknown)}. The supported"
            f" fieldgroups are: {', '.join(sorted(FIELDGROUPS))}",
        )
    if "COMPACT" in groups and len(groups) > 1:
        return _bad(
            11018,
            "The specified fieldgroups are invalid. The COMPACT fieldgroup cannot be combined"
            " with another fieldgroup.",
        )
    item_id = request.match_info["item_id"]
    try:
        details = sandbox.catalog.ebay_details(item_id)
    except LookupError:
        # eBay answers 404 (the document lists 11001 under 400; see docs/sandbox.md).
        body = error(11001, "The specified item Id was not found.")
        body["errors"][0]["parameters"] = [{"name": "itemId", "value": item_id}]
        return json_response(body, status=404)
    if groups == ["COMPACT"]:
        details = {k: v for k, v in details.items() if k in COMPACT_FIELDS}
    return json_response(details)


def _admit(request: web.Request, *, marketplace_error: int = 12019) -> Sandbox:
    """Check the token, the marketplace header, the rate limit and queued failures.

    A missing or unknown marketplace is refused with `marketplace_error` (search lists
    12019, getItem 11011), though eBay would fall back to EBAY_US: see docs/sandbox.md.
    """
    sandbox = request.app[SANDBOX]
    record = request[RECORD]
    record.api = "ebay"
    header = request.headers.get("Authorization", "")
    scheme, _, access_token = header.partition(" ")
    entry = sandbox.tokens.get(access_token.strip()) if scheme.lower() == "bearer" else None
    if entry is None or entry[1] <= sandbox.clock():
        raise Rejected(
            json_response(
                error(
                    1001,
                    "Invalid access token. Check the value of the Authorization HTTP request "
                    "header.",
                    domain="OAuth",
                ),
                status=401,
            )
        )
    client = entry[0]
    record.who = client
    if request.headers.get("X-EBAY-C-MARKETPLACE-ID") not in MARKETPLACES:
        raise Rejected(
            _bad(
                marketplace_error,
                "The X-EBAY-C-MARKETPLACE-ID header is missing or names an unsupported "
                f"marketplace. The supported Marketplaces are: {', '.join(sorted(MARKETPLACES))}.",
            )
        )
    limit = sandbox.limit()
    if limit and sandbox.window.admit(f"ebay:{client}", limit) is None:
        body = error(2001, "The request limit has been reached for the resource.", domain="ACCESS")
        raise Rejected(json_response(body, status=429, headers={"Retry-After": "1"}))
    status = sandbox.take_failure()
    if status is not None:
        raise Rejected(failure_response(status))
    return sandbox


def _page(
    request: web.Request, *, matches: int, limit: int, offset: int, items: list[JSON]
) -> JSON:
    """The answer's paging fields: `total` an estimate, `next` only when more items match
    (and, unless `ebay_next_past_cap`, only at an offset below 10 000), `prev` only when
    there is a page before."""
    url = request.url
    faults = request.app[SANDBOX].faults
    total = max(matches * (100 + faults.ebay_total_skew) // 100, 0)
    body: JSON = {"href": str(url), "total": total, "limit": limit, "offset": offset}
    following = offset + limit
    more = offset + len(items) < matches
    if more and (following < MAX_RESULTS or faults.ebay_next_past_cap):
        body["next"] = str(url.update_query(offset=str(following), limit=str(limit)))
    if offset > 0:
        body["prev"] = str(url.update_query(offset=str(max(offset - limit, 0)), limit=str(limit)))
    if items:  # eBay leaves itemSummaries out of an empty page
        body["itemSummaries"] = items
    return body


def _unknown_seller(seller: str) -> JSON:
    """Warning 12003, listed under the 200 answer; which parameter eBay names is not
    documented, so the sandbox names the seller."""
    message = "A seller 'username' provided in the request filters is invalid."
    warning: JSON = error(12003, message)["errors"][0]
    warning["parameters"] = [{"name": "sellers", "value": seller}]
    return warning


def _sellers(filter_param: str) -> list[str] | None:
    match = _SELLERS.search(filter_param)
    if match is None:
        return None
    return [seller.strip() for seller in match.group(1).split("|") if seller.strip()]


def _int_param(value: str, error_id: int, message: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise Rejected(_bad(error_id, message)) from None


def _bad(error_id: int, message: str) -> web.Response:
    return json_response(error(error_id, message), status=400)


def _oauth_error(status: int, code: str, description: str) -> web.Response:
    return json_response({"error": code, "error_description": description}, status=status)
