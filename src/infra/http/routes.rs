//! Routes declared once: one table per API module gives both the router that serves it and the
//! `(method, path)` list that the OpenAPI agreement test (tests/it/openapi.rs) and the deployment
//! checks read, so the two cannot drift.

/// One route as the agreement test reads it: a lowercase method and an axum path.
pub type Route = (&'static str, &'static str);

/// Declares a module's routes: a const list of them and the function building their router.
///
/// ```ignore
/// routes! {
///     /// Every route this module serves.
///     pub const ROUTES;
///     pub fn router(state: &AppState) -> Router<AppState> {
///         post "/api/v1/ingest" => ingest, layer(DefaultBodyLimit::max(state.limit));
///         get "/api/v1/things/{id}" => get_thing;
///     }
/// }
/// ```
///
/// Methods are `axum::routing`'s functions; routes on one path merge into one method router.
/// A `layer(...)` applies to that route only; its expression may use the function's arguments.
macro_rules! routes {
    (
        $(#[$list_meta:meta])*
        $list_vis:vis const $list:ident;
        $(#[$fn_meta:meta])*
        $fn_vis:vis fn $name:ident($($arg:ident: $arg_ty:ty),* $(,)?) -> Router<$state:ty> {
            $($method:ident $path:literal => $handler:expr $(, layer($layer:expr))?;)+
        }
    ) => {
        $(#[$list_meta])*
        $list_vis const $list: &[$crate::infra::http::Route] = &[$((stringify!($method), $path)),+];

        $(#[$fn_meta])*
        $fn_vis fn $name($($arg: $arg_ty),*) -> ::axum::Router<$state> {
            ::axum::Router::new()
                $(.route($path, ::axum::routing::$method($handler)$(.layer($layer))?))+
        }
    };
}
pub(crate) use routes;

/// Several modules' route lists as one const list (`concat_routes!(api::ROUTES, OTHER)`).
macro_rules! concat_routes {
    ($($part:expr),+ $(,)?) => {{
        const N: usize = 0 $(+ $part.len())+;
        const ALL: [$crate::infra::http::Route; N] = $crate::infra::http::routes::concat(&[$($part),+]);
        &ALL
    }};
}
pub(crate) use concat_routes;

/// The lists one after the other; `N` is their total length.
pub const fn concat<const N: usize>(parts: &[&[Route]]) -> [Route; N] {
    let mut out: [Route; N] = [("", ""); N];
    let (mut i, mut k) = (0, 0);
    while i < parts.len() {
        let mut j = 0;
        while j < parts[i].len() {
            out[k] = parts[i][j];
            k += 1;
            j += 1;
        }
        i += 1;
    }
    assert!(k == N, "N is the total length of the parts");
    out
}

#[cfg(test)]
mod tests {
    use axum::Router;

    async fn ok() -> &'static str {
        "ok"
    }

    routes! {
        const LISTED;
        fn router(limit: usize) -> Router<()> {
            get "/a" => ok;
            post "/a" => ok, layer(axum::extract::DefaultBodyLimit::max(limit));
            delete "/b/{id}" => ok;
        }
    }

    #[test]
    fn the_list_is_the_table_and_lists_join() {
        assert_eq!(
            LISTED,
            &[("get", "/a"), ("post", "/a"), ("delete", "/b/{id}")]
        );
        let _: Router = router(16);
        const BOTH: &[super::Route] = concat_routes!(LISTED, &[("get", "/c")]);
        assert_eq!(BOTH.len(), 4);
        assert_eq!(BOTH[3], ("get", "/c"));
        assert_eq!(BOTH[..3], *LISTED);
    }
}
