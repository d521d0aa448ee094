// A real OpenID Provider for the dashboard's sign-in tests: the certified
// `oidc-provider` package, on loopback, with one public client that must
// use PKCE. Its development login page accepts any login; the login names
// the account, and the account's groups follow from it:
//   admin…    → ["stacyvm-admins"]
//   operator… → ["stacyvm-operators"]
//   viewer…   → ["stacyvm-viewers"]
//   anything else → no group
// Consent is granted without a page (the test is the only user).
//
// Usage: OIDC_PROVIDER=<path to oidc-provider's package dir> \
//   node oidc-idp.mjs <port> <client_id> <redirect_uri>
// Prints "ready <issuer>" once listening.

import { createRequire } from "node:module";
import path from "node:path";

const [port, clientId, redirectUri] = process.argv.slice(2);
if (!port || !clientId || !redirectUri) {
  console.error("usage: node oidc-idp.mjs <port> <client_id> <redirect_uri>");
  process.exit(2);
}
const pkg = process.env.OIDC_PROVIDER;
if (!pkg) {
  console.error("set OIDC_PROVIDER to the oidc-provider package directory (scripts/test installs it)");
  process.exit(2);
}
const require = createRequire(import.meta.url);
const entry = require.resolve(path.resolve(pkg));
const { default: Provider } = await import(entry);

const issuer = `http://127.0.0.1:${port}`;

function groupsOf(login) {
  for (const g of ["admin", "operator", "viewer"]) {
    if (login.startsWith(g)) return [`stacyvm-${g}s`];
  }
  return [];
}

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      redirect_uris: [redirectUri],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    },
  ],
  pkce: { required: () => true },
  scopes: ["openid", "email", "profile", "groups"],
  claims: { openid: ["sub"], email: ["email"], groups: ["groups"], profile: ["name"] },
  // Scope claims in the ID token itself (the dashboard reads no userinfo).
  conformIdTokenClaims: false,
  cookies: { keys: ["stacyvm-test-idp-cookie-key"] },
  ttl: { IdToken: 3600 },
  async findAccount(_ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.test`, name: id, groups: groupsOf(id) };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope("openid email profile groups");
    grant.addOIDCClaims(["email", "groups", "name"]);
    await grant.save();
    return grant;
  },
});
provider.on("server_error", (_ctx, err) => console.error("idp server_error:", err));

const server = provider.listen(Number(port), "127.0.0.1", () => {
  console.log(`ready ${issuer}`);
});
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
