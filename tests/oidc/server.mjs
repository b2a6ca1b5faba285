// A real OpenID Connect provider for mayfly's end-to-end tests: npm's `oidc-provider` (a
// certified OP), pinned by package-lock.json. Started by tests/src/oidc.rs:
//
//   node server.mjs --port 0 --jwks keys.json [--id-token-ttl 3600] [--device-code-ttl 600]
//
// Listens on 127.0.0.1 (port 0: any free one), issuer http://127.0.0.1:PORT, and prints (stderr)
// "oidc-provider listening on http://127.0.0.1:PORT" once it serves. Device flow on; one public
// client `mayfly-cli` (no secret; device code, and authorization code with PKCE on a loopback
// redirect, any port per RFC 8252); a `groups` claim from the account table below; signing keys
// from the JWK Set file (private keys: the harness writes them, so a test can rotate keys by
// restarting with another file and sign deliberately bad tokens with the same keys). The
// provider's development interactions (a login form that takes any password, then a consent
// form) are what a test completes over plain HTTP, as a browser would.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  if (i === -1 || i + 1 >= process.argv.length) {
    if (fallback === undefined) {
      console.error(`missing ${name}`);
      process.exit(2);
    }
    return fallback;
  }
  return process.argv[i + 1];
}

const port = Number(arg('--port', '0'));
const jwks = JSON.parse(readFileSync(arg('--jwks'), 'utf8'));
const idTokenTtl = Number(arg('--id-token-ttl', '3600'));
const deviceCodeTtl = Number(arg('--device-code-ttl', '600'));

// Who may sign in, and their groups; any other login signs in with no groups.
const groups = {
  alice: ['oncall'],
  bob: ['db-admins'],
};

const server = createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: 'mayfly-cli',
        token_endpoint_auth_method: 'none',
        application_type: 'native',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'authorization_code'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
        id_token_signed_response_alg: 'ES256',
      },
    ],
    jwks,
    cookies: { keys: ['mayfly-test-only-cookie-key'] },
    claims: { openid: ['sub', 'groups'] },
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
    },
    findAccount: async (_ctx, id) => ({
      accountId: id,
      claims: async () => ({ sub: id, groups: groups[id] ?? [] }),
    }),
    ttl: {
      IdToken: idTokenTtl,
      AccessToken: 600,
      DeviceCode: deviceCodeTtl,
      Interaction: 600,
      Session: 600,
      Grant: 600,
    },
  });
  server.on('request', provider.callback());
  console.error(`oidc-provider listening on ${issuer}`);
});
server.on('error', (e) => {
  console.error(`oidc-provider cannot listen: ${e.message}`);
  process.exit(1);
});
